"""Batched writes: many messages per transaction during a reconcile, each still all-or-nothing.

One transaction per message costs one commit per message (SQLite: a WAL append and a lock
hand-over; PostgreSQL: a round trip and a WAL flush), more than indexing the message itself.
Inside ``Store.batch()`` the writes of the calling thread share one transaction, committed every
``max_writes`` writes or ``max_seconds`` (checked after each write) and when the block ends.
Each write (one ``save_message``: the message row, its file, links, unmatched addresses and
outbox rows) runs in its own savepoint, so a failing one leaves none of its rows and the batch
goes on; reads on the same thread see the batch's rows. SQLite writes a group of new messages
given as rows (``save_rows``) without one: a savepoint makes it copy each page before its first
change, and a group nearly always goes in whole. When one is refused, the group's rows are
deleted again (or, failing that, the transaction is rolled back) and it goes one by one.

A crash before a commit loses that batch's index rows and outbox rows together, never a message:
the Maildir is the queue, and the next rescan indexes and links those files again. Hooks given
as ``before_commit`` run first: the watcher fsyncs there the directories its renames touched, so
no committed row can name a file whose move a crash could still undo.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sentlink.model import Record

if TYPE_CHECKING:
    from sentlink.store.sql import Connection

# Addresses whose records a batch keeps (see WriteBatch.records).
MAX_CACHED_ADDRESSES = 200_000
# Message-IDs whose thread links a batch keeps (see WriteBatch.threads).
MAX_CACHED_THREADS = 200_000

Finish = Callable[[bool], None]  # commit (True) or roll back (False) the open transaction


@dataclass
class WriteBatch:
    """The open batch of one thread."""

    max_writes: int
    max_seconds: float
    hooks: list[Callable[[], None]] = field(default_factory=list)
    conn: Connection | None = None  # the connection the open transaction is on
    finish: Finish | None = None  # set while a transaction is open
    writes: int = 0
    started: float = 0.0
    transactions: int = 0  # begun so far
    tuned: bool = False  # the backend's batch settings are on (SqlStore._batch_settings)
    # records_by_email answers while a transaction is open. With SQLite nobody else can change
    # records meanwhile (the batch holds the write lock), and the answers carry over to the
    # batch's next transaction when no other connection committed in between (the backend's
    # records_version is unchanged): a reconcile then looks each correspondent up once, not
    # once per transaction. With PostgreSQL (no such version) they are dropped at each begin,
    # so a record another node commits is seen from the next transaction on, at most
    # max_seconds later. Cleared whenever this thread writes records or rolls back.
    records: dict[str, list[Record]] = field(default_factory=dict)
    records_version: object = None
    # ``records`` holds every address of every record (a small CRM loaded whole, see
    # SqlStore.prime_records): an address not in it has no record.
    records_complete: bool = False
    full_loads: int = 0  # whole loads so far; a batch whose loads keep going stale stops
    # The (kind, id) of the records linked to each (account, Message-ID) looked up together
    # (SqlStore.prime_thread_links), held and dropped with ``records``; for the accounts in
    # ``threads_complete`` (loaded whole), a Message-ID not in it has no message at all. This
    # thread's writes keep it true: a new message's entry is set to the links written; a write
    # that may change an indexed message's links (or drop it) sets its entry to None (ask the
    # database).
    threads: dict[tuple[str, str], set[tuple[str, str]] | None] = field(default_factory=dict)
    threads_complete: set[str] = field(default_factory=set)
    thread_loads: int = 0  # whole loads so far, as full_loads

    def begin(self, conn: Connection, finish: Finish, records_version: object = None) -> None:
        self.conn, self.finish = conn, finish
        self.writes = 0
        self.transactions += 1
        self.started = time.monotonic()
        if records_version is None or records_version != self.records_version:
            self._clear_records()
        self.records_version = records_version

    def remember(self, email: str, records: list[Record]) -> None:
        # A bound on memory: a mailbox may have hundreds of thousands of correspondents.
        if len(self.records) >= MAX_CACHED_ADDRESSES:
            self._clear_records()
        self.records[email] = records

    def load_all(self, records: dict[str, list[Record]]) -> None:
        """Every address there is, with its records (SqlStore.prime_records)."""
        self.records = records
        self.records_complete = True
        self.full_loads += 1

    def _clear_records(self) -> None:
        self.records = {}
        self.records_complete = False
        self.threads = {}
        self.threads_complete = set()

    def due(self) -> bool:
        return self.writes >= self.max_writes or time.monotonic() - self.started >= self.max_seconds

    def end(self, commit: bool) -> None:
        """Commit (hooks first) or roll back the open transaction, if any."""
        finish, self.finish, self.conn = self.finish, None, None
        if not commit:
            self.forget_records()
        if finish is None:
            return
        try:
            if commit:
                for hook in self.hooks:
                    hook()
        except BaseException:
            self.forget_records()
            finish(False)
            raise
        try:
            finish(commit)
        except BaseException:
            self.forget_records()  # the commit failed: the transaction is gone
            raise

    def forget_records(self) -> None:
        """Drop the cached answers (records written, or rows they came from rolled back)."""
        self._clear_records()
        self.records_version = None
