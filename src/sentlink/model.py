"""The shared vocabulary: small frozen dataclasses passed between the components."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

RecordKind = Literal["contact", "lead"]
Role = Literal["to", "cc", "bcc", "from"]
Direction = Literal["sent", "received"]
Via = Literal["address", "thread"]


@dataclass(frozen=True)
class Envelope:
    """What the SMTP session told us: the only place Bcc recipients are visible."""

    queue_id: str
    mail_from: str
    rcpt_to: tuple[str, ...]
    client_addr: str = ""
    auth_login: str | None = None
    daemon_name: str | None = None


@dataclass(frozen=True)
class Record:
    """A CRM contact or lead with one or more addresses."""

    kind: RecordKind
    id: str
    name: str
    emails: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class Participant:
    email: str  # normalized
    role: Role
    display_name: str = ""


@dataclass(frozen=True)
class MessageInfo:
    """One message file as the linker sees it: headers only, parsed once."""

    account: str
    folder: str
    uniq: str  # Maildir unique name: the file name before ":2,"
    file: str  # path relative to the account's Maildir root
    direction: Direction
    message_id: str
    subject: str
    date: str  # ISO 8601, "" when the Date header is missing or invalid
    participants: tuple[Participant, ...]
    in_reply_to: tuple[str, ...] = ()
    private: bool = False


@dataclass(frozen=True)
class Link:
    account: str
    message_id: str
    record: Record
    email: str
    role: Role
    via: Via
    direction: Direction
