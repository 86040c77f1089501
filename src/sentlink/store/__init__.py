"""The link store: CRM records, indexed messages and their links, behind one small interface.

``open_store(url)`` picks the backend from the URL scheme. Every backend keeps the same
guarantees: addresses are stored normalized (``sentlink.addresses.normalize_address``), and
``save_message`` writes the message and its links in one transaction (or one savepoint of a
``batch``), idempotent on (account, Maildir unique name) and on (account, Message-ID).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol, TypedDict

from sentlink.errors import StoreError
from sentlink.model import Direction, Link, MessageInfo, Record, RecordKind, Role, Via

__all__ = [
    "Delivery",
    "DeliveryState",
    "IndexedFile",
    "LinkRow",
    "MessageRows",
    "NewEvent",
    "OutboxRow",
    "RecordRow",
    "SaveRequest",
    "Store",
    "StoreError",
    "UnmatchedRow",
    "open_store",
]

DeliveryState = Literal["pending", "done", "dead"]


@dataclass(frozen=True)
class NewEvent:
    """An event to put in the outbox, for delivery to each of ``hooks``.

    ``records`` are ``kind:id`` keys: deliveries to one hook of events sharing a record go out
    in the order the events were written.
    """

    id: str  # the idempotency key (webhook-id); a second event with the same id is ignored
    type: str
    payload: str  # the whole event, JSON
    records: tuple[str, ...]
    hooks: tuple[str, ...]
    created_at: float  # Unix time


@dataclass(frozen=True)
class SaveRequest:
    """The arguments of one ``Store.save_message``, for ``Store.save_messages``."""

    info: MessageInfo
    links: Sequence[Link]
    events: Sequence[NewEvent] = ()
    unmatched: Sequence[str] = ()
    new_records: Sequence[Record] = ()


class MessageRows(NamedTuple):
    """A new message as ``Store.save_rows`` writes it: what ``save_message`` writes for a
    request without events or new records, as plain values. A reconcile writes tens of
    thousands of messages; a MessageInfo, a Link per record and a SaveRequest for each cost its
    main process more than the rows' own writes (watch/scan.py)."""

    account: str
    uniq: str
    folder: str
    file: str
    direction: Direction
    message_id: str
    subject: str
    date: str
    links: tuple[tuple[RecordKind, str, str, Role, Via], ...]  # (kind, record id, email, role, via)
    unmatched: tuple[str, ...] = ()

    @classmethod
    def of(cls, request: SaveRequest) -> MessageRows | None:
        """The rows of a request that rows can say (no events, no new records, not private),
        or None."""
        info = request.info
        if request.events or request.new_records or info.private:
            return None
        links = tuple(
            [(ln.record.kind, ln.record.id, ln.email, ln.role, ln.via) for ln in request.links]
        )
        return cls(
            info.account,
            info.uniq,
            info.folder,
            info.file,
            info.direction,
            info.message_id,
            info.subject,
            info.date,
            links,
            tuple(request.unmatched),
        )

    def message_info(self) -> MessageInfo:
        """The message's row as a MessageInfo (without participants: the store keeps none)."""
        return MessageInfo(
            self.account,
            self.folder,
            self.uniq,
            self.file,
            self.direction,
            self.message_id,
            self.subject,
            self.date,
            (),
        )

    def request(self) -> SaveRequest:
        """The same write as a SaveRequest. Its links name each record by kind and id only
        (what the store writes of it)."""
        info = self.message_info()
        account, message_id, direction = self.account, self.message_id, self.direction
        links = [
            Link(account, message_id, Record(kind, rid, "", ()), email, role, via, direction)
            for kind, rid, email, role, via in self.links
        ]
        return SaveRequest(info, links, (), self.unmatched)


@dataclass(frozen=True)
class IndexedFile:
    """One Maildir file the store has indexed."""

    uniq: str  # the Maildir unique name
    folder: str
    file: str  # relative to the account's Maildir root


@dataclass(frozen=True)
class Delivery:
    """One event claimed for one hook."""

    event_pk: int
    hook: str
    event_id: str
    type: str
    payload: str
    attempts: int  # attempts before this one
    since: float  # Unix time the dead-letter age counts from


@dataclass(frozen=True)
class Attempt:
    """The outcome of one delivery attempt, as the worker records it."""

    event_pk: int
    state: DeliveryState  # done, dead, or pending again at next_at
    next_at: float
    error: str
    at: float  # when the attempt ended


class OutboxRow(TypedDict):
    """One delivery as ``sentlink outbox list --json`` prints it (members only ever added)."""

    id: str
    type: str
    hook: str
    state: str  # pending | done | dead
    attempts: int
    created: str  # ISO 8601
    next_attempt: str  # ISO 8601, "" unless pending
    last_error: str
    hook_disabled: bool


class UnmatchedRow(TypedDict):
    """An address that matched no record in one account's messages, as
    ``sentlink links --unmatched --json`` prints it (members only ever added)."""

    account: str
    email: str
    messages: int
    first: str  # ISO 8601 indexing time of the first and last such message
    last: str


class RecordRow(TypedDict):
    kind: str
    id: str
    name: str
    email: str  # the address the message was linked through


class LinkRow(TypedDict):
    """One link as the ``links`` command prints it (JSON Lines members; only ever added to)."""

    account: str
    direction: str
    message_id: str
    subject: str
    date: str
    folder: str
    file: str
    record: RecordRow
    role: str
    via: str


class Store(Protocol):
    def upsert_record(self, record: Record) -> None:
        """Insert or update a record; its address set is replaced by ``record.emails``."""

    def upsert_records(self, records: Iterable[Record]) -> int:
        """``upsert_record`` for many records in one transaction; returns how many."""

    def records_by_email(self, email: str) -> list[Record]:
        """Records having this (normalized) address, contacts first, then by id."""

    def prime_records(self, emails: Iterable[str]) -> None:
        """Inside ``batch()``: look these addresses up together now (or, for a CRM of up to
        50,000 addresses, every address at once), so the ``records_by_email`` calls that follow
        are answered from the batch's cache. Outside a batch it does nothing; ``emails`` is
        only iterated when it is needed."""

    def prime_thread_links(self, account: str, message_ids: Iterable[str]) -> None:
        """Inside ``batch()``: look up which records these messages of the account are linked
        to, together now, so ``linked_records_for_message_ids`` calls that name only such ids
        are answered from the batch's cache (kept true across the batch's own writes). Outside
        a batch it does nothing."""

    def has_message(self, account: str, uniq: str) -> bool:
        """Whether the file with this Maildir unique name is already indexed."""

    def message_location(self, account: str, uniq: str) -> tuple[str, str] | None:
        """``(folder, file)`` recorded for that file, or None when it is not indexed."""

    def move_message(self, account: str, uniq: str, folder: str, file: str) -> bool:
        """Record a new folder/file name for an indexed file (a move or a flag rename)."""

    def folder_files(self, account: str, folder: str) -> dict[str, str]:
        """``{uniq: file}`` of every file indexed in the account's ``folder`` (one query: a
        rescan compares a directory listing against it without opening a message)."""

    def account_uniqs(self, account: str) -> set[str]:
        """The unique names of every file indexed for the account, in any folder."""

    def message_files(self, account: str, message_id: str) -> list[IndexedFile]:
        """Every indexed file of the account's message with this Message-ID, oldest first."""

    def batch(
        self,
        max_writes: int = 500,
        max_seconds: float = 0.5,
        before_commit: Callable[[], None] | None = None,
    ) -> AbstractContextManager[None]:
        """Within the block, this thread's writes share transactions: committed after
        ``max_writes`` writes or ``max_seconds``, and when the block ends; ``before_commit``
        runs before each commit. Every write stays all-or-nothing on its own (a savepoint), and
        this thread's reads see the uncommitted rows. A crash loses at most the rows of the
        open transaction, which a rescan writes again from the Maildir (store/batch.py).
        A nested block joins the open batch and commits when it ends."""

    def save_message(
        self,
        info: MessageInfo,
        links: Sequence[Link],
        events: Sequence[NewEvent] = (),
        unmatched: Sequence[str] = (),
        new_records: Sequence[Record] = (),
    ) -> bool:
        """Index a message, its links, its outbox events, the participant addresses that
        matched no record (kept for review) and records created for it, in one transaction:
        all of it or none of it.

        Returns False, writing nothing else, when the account already has this unique name or
        (for a non-empty Message-ID) this Message-ID; in the latter case the file is remembered
        as another copy of the indexed message so ``has_message`` is true for it from now on.
        """

    def save_messages(self, requests: Sequence[SaveRequest]) -> list[bool | StoreError]:
        """``save_message`` for each request in order, each all-or-nothing, with what each
        returned or the StoreError it raised; a backend may write them with fewer statements.
        """

    def save_rows(self, rows: Sequence[MessageRows]) -> list[bool | StoreError]:
        """``save_messages`` of ``[r.request() for r in rows]``, from the rows themselves."""

    # outbox

    def claim_deliveries(
        self, hook: str, owner: str, limit: int, lease_seconds: float, now: float
    ) -> list[Delivery]:
        """Lease up to ``limit`` due deliveries of ``hook`` to ``owner``, oldest first.

        A delivery is due when pending, its time has come, nobody holds a live lease on it, and
        no earlier pending event of the same hook shares one of its records (order per record).
        """

    def extend_lease(self, hook: str, owner: str, event_pks: Sequence[int], until: float) -> None:
        """Keep holding these claimed deliveries until ``until``."""

    def finish_deliveries(self, hook: str, attempts: Sequence[Attempt]) -> None:
        """Record attempts of ``hook`` in one transaction: each ``done``, ``dead``, or
        ``pending`` again at its ``next_at``."""

    def disable_hook(self, hook: str, reason: str, now: float) -> None:
        """Stop delivering to ``hook`` (the receiver said 410 Gone) until re-enabled."""

    def enable_hook(self, hook: str) -> bool:
        """Deliver to ``hook`` again; True when it was disabled."""

    def disabled_hooks(self) -> dict[str, str]:
        """Disabled hook name -> reason."""

    def outbox_rows(
        self, states: Collection[str], hook: str | None = None, limit: int | None = None
    ) -> Iterator[OutboxRow]:
        """Deliveries in these states (of ``hook`` when given), oldest first."""

    def retry_deliveries(self, hook: str | None, event_ids: Collection[str], now: float) -> int:
        """Pending or dead deliveries (of ``hook``; with these ids when given) due now, their
        dead-letter age restarted. Returns how many."""

    def drop_deliveries(self, hook: str | None, event_ids: Collection[str]) -> int:
        """Delete pending or dead deliveries (of ``hook``; with these ids when given)."""

    # unmatched addresses (crm.unmatched: review)

    def unmatched_addresses(self, account: str | None = None) -> list[UnmatchedRow]:
        """Addresses kept for review with their message counts per account: by account, then
        most frequent first."""

    def messages_for_emails(self, emails: Collection[str]) -> list[tuple[str, str]]:
        """``(account, uniq)`` of one file of each message with an unmatched address among
        ``emails``: what to link again once their records are known."""

    def forget_messages(self, keys: Collection[tuple[str, str]]) -> int:
        """Drop these messages (by one file's ``(account, uniq)``) so they are linked again."""

    def linked_records_for_message_ids(
        self, account: str, message_ids: Sequence[str]
    ) -> list[Record]:
        """Records linked to any of these messages of the account (thread continuity)."""

    def add_links(
        self, info: MessageInfo, links: Sequence[Link], events: Sequence[NewEvent] = ()
    ) -> int:
        """Add ``links`` found in another copy of an indexed message (same account and
        Message-ID, same direction, not private) with their events, in one transaction;
        returns how many links were new. Nothing is added when no such message is indexed."""

    def query_links(
        self,
        account: str | None = None,
        email: str | None = None,
        record: tuple[str, str] | None = None,
        message_id: str | None = None,
    ) -> Iterator[LinkRow]:
        """Links matching every given filter, in the order their messages were indexed."""

    def forget_missing(
        self, account: str, present_uniqs: Collection[str], folder: str | None = None
    ) -> int:
        """Drop indexed files of the account (in ``folder`` when given) that are not present.

        A message whose last file is gone is dropped with its links. Returns files dropped.
        """

    def forget_account(self, account: str) -> int:
        """Drop every indexed message of the account (for a full reindex). Records stay."""

    def schema_version(self) -> int:
        """The migration step the database is at."""

    def close(self) -> None: ...


def open_store(url: str) -> Store:
    """Open the store a ``store.url`` names: ``sqlite:///relative/path``, ``sqlite:////abs``,
    ``postgresql://user@host/db``. Opening applies pending migrations.

    Raises StoreError when the URL is not understood or the store cannot be opened.
    """
    scheme, sep, _rest = url.partition("://")
    if sep and scheme == "sqlite":
        from sentlink.store.sqlite import SqliteStore, sqlite_path

        return SqliteStore(sqlite_path(url))
    if sep and scheme in ("postgresql", "postgres"):
        from sentlink.store.postgres import PostgresStore

        return PostgresStore(url)
    # The URL is not echoed: a postgresql:// URL may carry a password.
    raise StoreError("unsupported store URL (expected sqlite:///PATH or postgresql://...)")
