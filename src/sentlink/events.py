"""Outbox events: ``message.linked`` and ``record.created``, in the Standard Webhooks layout.

An event is ``{"id", "type", "timestamp", "data"}``; ``id`` is the idempotency key a receiver
dedupes on (the ``webhook-id`` header). It is derived from what the event is about, not from
when it was written, so re-linking the same message to the same records (``reindex --full``, a
second node) yields the same id and the store keeps the first. Members are only ever added.
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sentlink.headers import StrPath
from sentlink.model import Link, MessageInfo, Participant, Record
from sentlink.store import NewEvent

MESSAGE_LINKED = "message.linked"
RECORD_CREATED = "record.created"
EVENT_TYPES = (MESSAGE_LINKED, RECORD_CREATED)

# Attachment names come from parsing the MIME structure; past this size the names are left out
# rather than holding a huge message in memory.
MAX_PARSE_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class MessageFacts:
    """What the event tells about the file beyond its headers (never the body)."""

    size: int
    attachments: tuple[str, ...]
    sender: Participant | None


def record_key(kind: str, rid: str) -> str:
    return f"{kind}:{rid}"


def _event_id(*parts: str) -> str:
    digest = hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()
    return f"msg_{digest[:32]}"


def _timestamp(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")


def message_facts(path: StrPath, sender: Participant | None) -> MessageFacts:
    """Size and attachment file names of a message file (RFC 2183 filename, RFC 2231 decoded)."""
    size = os.stat(path).st_size
    names: list[str] = []
    if size <= MAX_PARSE_BYTES:
        with open(path, "rb") as f:
            msg = email.parser.BytesParser(policy=email.policy.compat32).parse(f)
        for part in msg.walk():
            if part.is_multipart():
                continue
            name = part.get_filename()
            if name:
                names.append(str(name))
    return MessageFacts(size, tuple(names), sender)


def message_linked(
    info: MessageInfo,
    links: Sequence[Link],
    facts: MessageFacts,
    hooks: Sequence[str],
    now: float | None = None,
) -> NewEvent:
    when = time.time() if now is None else now
    key = info.message_id or f"uniq:{info.uniq}"
    records = tuple(dict.fromkeys(record_key(ln.record.kind, ln.record.id) for ln in links))
    # The linked records are part of what the event is about: a message linked again to more
    # records (``crm import`` re-linking an address kept for review) is news, not a repeat.
    event_id = _event_id(MESSAGE_LINKED, info.account, key, *sorted(records))
    sender = facts.sender
    data: dict[str, Any] = {
        "account": info.account,
        "direction": info.direction,
        "message_id": info.message_id,
        "subject": info.subject,
        "date": info.date,
        "from": {"email": sender.email, "name": sender.display_name} if sender else None,
        "participants": [
            {"email": p.email, "role": p.role, "name": p.display_name} for p in info.participants
        ],
        "records": [
            {
                "kind": ln.record.kind,
                "id": ln.record.id,
                "name": ln.record.name,
                "email": ln.email,
                "role": ln.role,
                "via": ln.via,
            }
            for ln in links
        ],
        "size": facts.size,
        "attachments": list(facts.attachments),
        "folder": info.folder,
        "file": info.file,
        "uniq": info.uniq,
    }
    return _event(event_id, MESSAGE_LINKED, when, data, records, hooks)


def record_created(
    record: Record, info: MessageInfo, hooks: Sequence[str], now: float | None = None
) -> NewEvent:
    when = time.time() if now is None else now
    event_id = _event_id(RECORD_CREATED, record.kind, record.id)
    data = {
        "record": {
            "kind": record.kind,
            "id": record.id,
            "name": record.name,
            "emails": list(record.emails),
        },
        "account": info.account,
        "message_id": info.message_id,
    }
    return _event(
        event_id, RECORD_CREATED, when, data, (record_key(record.kind, record.id),), hooks
    )


def _event(
    event_id: str,
    kind: str,
    when: float,
    data: dict[str, Any],
    records: tuple[str, ...],
    hooks: Sequence[str],
) -> NewEvent:
    body = {"id": event_id, "type": kind, "timestamp": _timestamp(when), "data": data}
    payload = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return NewEvent(event_id, kind, payload, records, tuple(hooks), when)
