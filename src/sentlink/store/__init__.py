"""The link store: CRM records, indexed messages and their links, behind one small interface.

``open_store(url)`` picks the backend from the URL scheme. Every backend keeps the same
guarantees: addresses are stored normalized (``sentlink.addresses.normalize_address``), and
``save_message`` writes the message and its links in one transaction, idempotent on
(account, Maildir unique name) and on (account, Message-ID).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import Protocol, TypedDict

from sentlink.errors import StoreError
from sentlink.model import Link, MessageInfo, Record

__all__ = ["LinkRow", "RecordRow", "Store", "StoreError", "open_store"]


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

    def has_message(self, account: str, uniq: str) -> bool:
        """Whether the file with this Maildir unique name is already indexed."""

    def message_location(self, account: str, uniq: str) -> tuple[str, str] | None:
        """``(folder, file)`` recorded for that file, or None when it is not indexed."""

    def move_message(self, account: str, uniq: str, folder: str, file: str) -> bool:
        """Record a new folder/file name for an indexed file (a move or a flag rename)."""

    def save_message(self, info: MessageInfo, links: Sequence[Link]) -> bool:
        """Index a message and its links in one transaction.

        Returns False, writing no links, when the account already has this unique name or
        (for a non-empty Message-ID) this Message-ID; in the latter case the file is remembered
        as another copy of the indexed message so ``has_message`` is true for it from now on.
        """

    def linked_records_for_message_ids(
        self, account: str, message_ids: Sequence[str]
    ) -> list[Record]:
        """Records linked to any of these messages of the account (thread continuity)."""

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

    def close(self) -> None: ...


def open_store(url: str) -> Store:
    """Open the store a ``store.url`` names: ``sqlite:///relative/path``, ``sqlite:////abs``.

    Raises StoreError when the URL is not understood or the store cannot be opened.
    """
    scheme, sep, _rest = url.partition("://")
    if sep and scheme == "sqlite":
        from sentlink.store.sqlite import SqliteStore, sqlite_path

        return SqliteStore(sqlite_path(url))
    raise StoreError(f"unsupported store URL {url!r} (expected sqlite:///PATH)")
